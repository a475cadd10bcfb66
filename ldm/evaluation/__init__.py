"""Scoring generated images: prompt accuracy (shapes), class accuracy (digits), image metrics."""
