"""hybridlab dashboard."""
