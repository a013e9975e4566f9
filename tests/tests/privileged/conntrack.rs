//! Connection table test: placeholder replaced below.
