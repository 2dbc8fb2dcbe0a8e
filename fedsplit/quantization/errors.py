"""Exceptions raised by :mod:`fedsplit.quantization`."""

from __future__ import annotations


class QuantizationError(ValueError):
    """A quantization request is invalid (unsupported bits or scheme, mismatched
    reference or masks, a module that cannot be converted)."""


class UpdateFormatError(QuantizationError):
    """Bytes handed to a decoder are not a well-formed fedsplit payload (wrong magic,
    unknown version or code, truncated, trailing garbage, inconsistent counts)."""


class ReferenceMismatchError(QuantizationError):
    """A delta-encoded update is decoded against a different reference than the one it
    was encoded against."""
