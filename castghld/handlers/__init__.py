"""The thin HTTP layer: handlers parse, authenticate and hand off to plain classes."""
