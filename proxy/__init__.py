"""wakegate's data path: HTTP/1.1 parsing, routing, client and upstream connections."""
