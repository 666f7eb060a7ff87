"""wakegate as a Kubernetes node: the host registers a Node, keeps it Ready, and runs the pods bound
to it as wakegate services, which sleep and wake in milliseconds while Kubernetes sees them Running.

``pods`` turns a pod into a service (or says why it cannot run), ``status`` writes what Kubernetes
sees of a pod, ``node`` keeps the Node and its Lease, ``agent`` ties them to the running wakegate.
"""
