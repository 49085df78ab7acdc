//! logrus-compatible log lines on stderr.
