"""tunnelnat: enrol EC2 instances behind an IPsec gateway that NATs them to a public address."""
