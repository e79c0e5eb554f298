"""Preprocessing: from a CT file to registered atlas patches."""

from drasclr_lib.preprocess.atlas import nearest_neighbors, normalize_locations

__all__ = ["nearest_neighbors", "normalize_locations"]
