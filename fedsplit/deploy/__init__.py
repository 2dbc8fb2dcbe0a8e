"""Real deployments: a TLS SuperLink with SuperNode authentication, devices, profiles.

Modules (imported on demand; this package imports nothing heavy):

``certs``       CA, server certificate and SuperNode keys (``cryptography``)
``federation``  :class:`~fedsplit.deploy.federation.Deployment`: start/stop the SuperLink
                and SuperNodes, register nodes, start runs (the flwr 1.41 CLIs)
``procs``       process groups + environment markers, so ``stop`` ends every child
``data``        one training partition per device on disk (``prepare-data``)
``bench``       per-cut client-segment time and memory on a device (``benchmark-device``)
``profile``     the device profile JSON schema (:class:`~fedsplit.deploy.profile.DeviceProfile`)
``netns``       emulated edge links: network namespaces, veth pairs, tc shaping
``cli``         the ``fedsplit-deploy`` command (``python -m fedsplit.deploy``)

See docs/deployment.md and docs/devices.md.
"""
