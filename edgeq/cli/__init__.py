"""Thin click commands over the library: parse, call, print. No logic lives here."""
