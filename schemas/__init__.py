"""JSON Schemas of cxrstore's on-disk format and outputs (package data)."""
