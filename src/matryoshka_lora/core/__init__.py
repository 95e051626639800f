"""The ground floor: the vector P (weighting), the rank controller on a PEFT model (model, peft_seam),
configs, rank specs, saving and loading adapters, metrics, and file helpers. Imports nothing above it."""
