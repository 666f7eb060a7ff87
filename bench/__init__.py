"""wakegate's benchmarks: parser micro-benchmarks and the proxy comparison runs."""
