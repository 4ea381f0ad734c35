"""CSR ragged arrays live in the engine (which cannot import speedyrec); re-exported for the data layer."""
from speedyrec.engine.ragged import Ragged, gather_padded, ragged_positions

__all__ = ["Ragged", "gather_padded", "ragged_positions"]
