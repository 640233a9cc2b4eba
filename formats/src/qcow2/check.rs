//! Metadata consistency check (placeholder: being written).
