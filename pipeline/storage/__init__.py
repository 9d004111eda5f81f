"""Shared storage: immutable published versions with manifests, and their verification."""
