"""genops' rating web UI and API: people compare, score and correct answers (a program of its own,
on the rating store; the code location reads the ratings from the same store)."""
