"""Maintenance helpers."""
