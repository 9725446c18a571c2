"""The additional layer store itself: image references resolved, layers kept and evicted, their info and blob files."""
