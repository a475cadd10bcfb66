"""Lightning callbacks (data health, sample grids, curriculum, ...)."""
