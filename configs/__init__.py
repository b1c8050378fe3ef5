"""editr1 configs, installed as package data (this folder is the repository's configs/)."""
