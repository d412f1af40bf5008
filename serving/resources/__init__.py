"""Small Falcon resource classes; each holds its collaborators as private attributes."""
