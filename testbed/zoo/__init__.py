"""Pretrained models the testbed knows by name: where they come from, where they are cached."""
