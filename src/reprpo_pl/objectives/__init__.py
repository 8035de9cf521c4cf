"""Preference objectives on aggregated completion log-probs, shared by the methods and the ReprPO losses."""
