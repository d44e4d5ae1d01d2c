"""Dataset preparation: each module turns raw text into token files under data/<name>/."""
