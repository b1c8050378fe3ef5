"""Files shipped with editr1 (this folder is the repository's data/), named asset:<path> in configs."""
