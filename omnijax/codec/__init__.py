"""Speech codec: quality metrics and baseline codecs."""
