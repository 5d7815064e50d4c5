"""Data: photos and condition maps from files (one-line ``InputError`` messages), image writing,
data sets."""
