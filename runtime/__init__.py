"""inferq runtime: settings, errors, actors, ONNX sessions, etcd membership."""
