"""Export: the plain-Keras inference model, .keras / SavedModel, transfer."""
