"""The FUSE side: the kernel protocol spoken on /dev/fuse, and the file system that translates the store into it."""
