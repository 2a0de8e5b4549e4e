"""tunnelnat's gateway software: everything that runs on a gateway instance, one package.

Built at synthesis into one zipapp (tools/gateway_package.py) with its SHA-256 and a version,
installed by the user data at first boot and by the InstallGatewaySoftware association, and run
as ``python3 <package> VERB ...`` by the systemd units and the SSM documents (``__main__``).
Standard library and the image's boto3 only; the pure parts of ``tunnelnat.core`` it needs ride
along in the archive.
"""
