"""Backends that exist only for the tests (each added to the catalogue by a test's fixture)."""
