"""Reference servers beside Chattle in `make bench`, so every report states a ratio."""
