# tunnelnat — every target installs what it needs (Debian packages, the .venv) on first use.
SHELL := /bin/bash
PY := .venv/bin/python
# What the AWS gateway installs from its image's archive (stacks/gateway.py GATEWAY_PACKAGES; a
# test keeps the two equal), then what only the lab needs (kernel-libipsec, tools, packets).
GATEWAY_PACKAGES := strongswan-swanctl charon-systemd nftables python3-boto3
APT_PACKAGES := $(GATEWAY_PACKAGES) libcharon-extra-plugins iproute2 \
	iptables curl tcpdump socat procps iputils-ping
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export CDK_DISABLE_CLI_TELEMETRY := 1
export AWS_EC2_METADATA_DISABLED := true

.PHONY: deps apt venv cloud-init-schema test test-unit test-lab lint demo synth documents package bench clean

deps: apt venv cloud-init-schema

# cloud-init's JSON schema, to check the gateway's user data against it (tests/infra): Debian's
# package unpacked under .deps (never installed: no cloud-init runs on this machine).
CLOUD_INIT_DIR := .deps/cloud-init
cloud-init-schema: $(CLOUD_INIT_DIR)/.stamp
$(CLOUD_INIT_DIR)/.stamp:
	@mkdir -p $(CLOUD_INIT_DIR)/deb
	@echo "cloud-init schema: unpacking Debian's cloud-init package into $(CLOUD_INIT_DIR)"
	@cd $(CLOUD_INIT_DIR)/deb && (apt-get download -qq cloud-init 2>/dev/null \
	  || (apt-get update -qq && apt-get download -qq cloud-init))
	@dpkg-deb -x $(CLOUD_INIT_DIR)/deb/cloud-init_*.deb $(CLOUD_INIT_DIR)
	@test -f $(CLOUD_INIT_DIR)/usr/lib/python3/dist-packages/cloudinit/config/schemas/schema-cloud-config-v1.json
	@touch $@

# Stamp files keep the second run fast; a changed requirements file re-installs.
apt: .deps/apt.stamp
.deps/apt.stamp:
	@mkdir -p .deps
	@if ! dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | grep -qv 'install ok installed' \
	    && [ "$$(dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | wc -l)" -ge "$(words $(APT_PACKAGES))" ]; then \
	  echo "debian packages: already installed"; \
	else \
	  echo "debian packages: installing $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi
	@touch $@

venv: .deps/venv.stamp
.deps/venv.stamp: requirements.txt requirements-dev.txt pyproject.toml
	@mkdir -p .deps
	@echo "python venv: installing requirements into .venv"
	@python3 -m pip --version >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq python3-pip python3-venv >/dev/null)
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check uv
	@[ -x $(PY) ] || python3 -m uv venv -q .venv
	@python3 -m uv pip install -q --python $(PY) --compile-bytecode -r requirements-dev.txt -e .
	@touch $@

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# What documents embed: AddHostRoute's route helper (instances run it), and the gateway documents'
# two shared pieces (gateway/package_check.sh, gateway/install_package.py, compact).
documents: venv
	$(PY) -m tools.build_documents

# The gateway software: one reproducible zipapp of gateway/tunnelnat_gateway and the core modules
# it imports, into .deps/gateway-package/ (prints its path, SHA-256, version and size). Synthesis,
# the lab and the bench build the same bytes themselves (docs/gateway-software.md).
package: venv
	$(PY) -m tools.gateway_package

# The whole suite: unit, moto-backed Lambda tests, documents, CDK and the namespace lab, on two
# workers (tests/conftest.py keeps each file, and the namespace suites, on one worker, and puts
# the longest first).
test: deps
	$(PY) -m ruff check .
	$(PY) -m tools.build_documents --check
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --no-loadscope-reorder --durations=25 tests

test-unit: venv
	$(PY) -m pytest -q tests/unit tests/lambdas tests/ssm_documents

test-lab: deps
	$(PY) -m pytest -q tests/lab

demo: deps
	$(PY) -m lab.demo

# Removes what an interrupted lab left (namespaces, processes, mounts, /run/tn-lab); the lab's
# own cleanup, refused while a lab is running.
.PHONY: lab-clean
lab-clean: venv
	$(PY) -m lab.topology cleanup

# cdk.json gives no partner or addresses (nobody's values are right for everyone): synth passes
# the documented example (documentation ranges, docs/stack.md) explicitly, as a deploy must.
# Another example: make synth SYNTH_CONTEXT="-c partner_endpoint=... ...".
SYNTH_CONTEXT ?= -c partner_endpoint=203.0.113.1 -c partner_networks=198.51.100.0/28 \
	-c address_pool=192.0.2.10,192.0.2.11 -c gateway_subnet_cidr=10.80.0.0/24 \
	-c gateway_private_ip=10.80.0.10
synth: venv
	$(PY) app.py $(SYNTH_CONTEXT)

# Every benchmark in one run, issue 23's several-partner figures among them (parts partners and
# tunnels: ~75 s more); one part alone: make bench BENCH_ARGS="--only tunnels".
bench: deps
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf cdk.out .deps .pytest_cache
