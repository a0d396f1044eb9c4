"""Loss math as pure functions: tensors in, scalar tensor out; no state, no models."""
