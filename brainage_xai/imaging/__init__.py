"""Images in template space: templates and the model grid, the registration check, the
atlas, and the geometry that takes maps between a layer's feature grid and the input."""
