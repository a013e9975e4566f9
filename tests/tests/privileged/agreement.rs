//! Agreement test: placeholder replaced below.
