"""One layer as files: the tree its table of contents describes, and how reads of it are served."""
