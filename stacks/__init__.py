"""The CDK side of tunnelnat: one stack (``TunnelnatStack``) made of readable constructs."""
