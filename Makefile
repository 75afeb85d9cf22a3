# MindRoom control plane. `make run` runs the stack; `make test` runs every test.
# Everything is found by wildcard: a new lib/*.c, functions/<name>/*.c or
# tests/unit/test_*.c needs no edit here.

CC      ?= cc
SAN     ?= 0
PKGS    := libcjson libcurl libpq openssl
WARN    := -Wall -Wextra -Wshadow -Wformat=2 -Wstrict-prototypes -Wmissing-prototypes \
           -Wwrite-strings -Wvla -Werror
CFLAGS_COMMON := -std=c11 -D_GNU_SOURCE -g -Ilib $(WARN) \
           $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
# What was built (scripts/version.sh) and the schema it expects (every migration's
# version): compiled into lib/mr_version.c only, which a stamp rebuilds when
# either changes.
VERSION        := $(shell scripts/version.sh)
SCHEMA_VERSIONS := $(shell ls sql/migrations | sed -n 's/^\([0-9][0-9]*\)_.*\.sql$$/\1/p' | sort -n | paste -sd, -)
LIBS    := -lfcgi $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -lcjson -lcurl -lpq -lssl -lcrypto) -lm

ifeq ($(SAN),1)
BUILD   := build/san
CFLAGS_MODE := -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
LDFLAGS_MODE := -fsanitize=address,undefined
else
BUILD   := build/release
CFLAGS_MODE := -O2 -D_FORTIFY_SOURCE=2 -fstack-protector-strong -fstack-clash-protection -fPIE
LDFLAGS_MODE := -pie -Wl,-z,relro,-z,now
endif
CFLAGS  := $(CFLAGS_COMMON) $(CFLAGS_MODE) $(EXTRA_CFLAGS)
LDFLAGS := $(LDFLAGS_MODE) $(EXTRA_LDFLAGS)

LIB_SRC   := $(wildcard lib/*.c)
LIB_OBJ   := $(LIB_SRC:lib/%.c=$(BUILD)/lib/%.o)
LIB_A     := $(BUILD)/libmindroom.a
FUNCS     := $(notdir $(patsubst %/,%,$(dir $(wildcard functions/*/*.c))))
FUNCS     := $(sort $(FUNCS))
FUNC_BINS := $(FUNCS:%=$(BUILD)/bin/%)
TEST_SRC  := $(wildcard tests/unit/test_*.c)
TEST_BINS := $(TEST_SRC:tests/unit/%.c=$(BUILD)/tests/%)

.PHONY: all build tests test run stop bench valgrind fuzz drills clean deps FORCE \
        install deb package-test
all: build
BENCH_BINS := $(patsubst tests/bench/%.c,$(BUILD)/bin/%,$(wildcard tests/bench/*.c))
TOOL_BINS  := $(patsubst scripts/%.c,$(BUILD)/bin/%,$(wildcard scripts/*.c))
build: $(FUNC_BINS) $(TOOL_BINS) $(BENCH_BINS)
tests: $(TEST_BINS)

$(BUILD)/lib/%.o: lib/%.c $(wildcard lib/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/version.stamp: FORCE
	@mkdir -p $(dir $@)
	@echo '$(VERSION) $(SCHEMA_VERSIONS)' | cmp -s - $@ || echo '$(VERSION) $(SCHEMA_VERSIONS)' > $@
$(BUILD)/lib/mr_version.o: $(BUILD)/version.stamp
$(BUILD)/lib/mr_version.o: CFLAGS += -DMR_VERSION='"$(VERSION)"' -DMR_SCHEMA_VERSIONS='"$(SCHEMA_VERSIONS)"'
FORCE:

$(LIB_A): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	ar rcs $@ $^

define FUNC_RULE
$(BUILD)/bin/$(1): $(wildcard functions/$(1)/*.c) $(wildcard functions/$(1)/*.h) $(LIB_A)
	@mkdir -p $$(dir $$@)
	$$(CC) $$(CFLAGS) -Ifunctions/$(1) $(wildcard functions/$(1)/*.c) $(LIB_A) $$(LDFLAGS) $$(LIBS) -o $$@
endef
$(foreach f,$(FUNCS),$(eval $(call FUNC_RULE,$(f))))

# Small command-line tools built from scripts/*.c (token minting, service files).
$(BUILD)/bin/%: scripts/%.c $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(LIB_A) $(LDFLAGS) $(LIBS) -o $@

# Never deployed: `make bench` and the runtime's integration tests
# (tests/bench/noop.c, a no-op libmindroom function; bare.c, libfcgi alone).
$(BUILD)/bin/%: tests/bench/%.c $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(LIB_A) $(LDFLAGS) $(LIBS) -o $@

$(BUILD)/tests/%: tests/unit/%.c $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(LIB_A) $(LDFLAGS) $(LIBS) -lcmocka -o $@

# Unit tests that #include a function's sources to test its static parts.
$(BUILD)/tests/test_provisioner_state $(BUILD)/tests/test_provisioner_validate $(BUILD)/tests/test_provisioner_wipe: $(wildcard functions/dokku-provisioner/*.[ch])
$(BUILD)/tests/test_itoken: $(wildcard functions/track-usage/*.[ch])

deps:
	@scripts/deps.sh

# The whole stack on embedded local defaults, in the foreground; Ctrl-C stops it.
run: deps
	@$(MAKE) --no-print-directory build
	@scripts/stack.sh run

stop:
	@scripts/stack.sh stop

# Every test: unit (cmocka, under ASan+UBSan), SQL (pgTAP), integration (pytest
# through real nginx and PostgreSQL). Ends with one summary line.
test: deps
	@$(MAKE) --no-print-directory SAN=1 build tests
	@scripts/test.sh

valgrind: deps
	@$(MAKE) --no-print-directory SAN=0 tests
	@scripts/valgrind.sh

bench: deps
	@$(MAKE) --no-print-directory build
	@scripts/bench.sh

fuzz: deps
	@scripts/fuzz.sh

drills: deps
	@$(MAKE) --no-print-directory SAN=1 build
	@scripts/drills.sh

# ---- install and package (docs/install.md) ----------------------------------
# `make install` copies the release build (SAN=1: the sanitizer build) and
# everything it runs with: binaries, mindroomctl, systemd units, tmpfiles.d and
# sysusers.d entries, nginx's configuration (in DATADIR/nginx, and the site, the
# operator's, written only where none exists yet), migrations, seed, docs, and the
# configuration templates (in DATADIR, and as mindroom.env and the provisioner's
# provisioner.env, each written only where none exists yet, mode 0600).
# The units, the nginx files and the scripts name the packaged layout (/usr/lib/mindroom,
# /etc/mindroom, /usr/share/mindroom, /etc/nginx); other directories are substituted
# on the way.
PREFIX      ?= /usr/local
SYSCONFDIR  ?= $(PREFIX)/etc
BINDIR      ?= $(PREFIX)/bin
LIBEXECDIR  ?= $(PREFIX)/lib/mindroom
DATADIR     ?= $(PREFIX)/share/mindroom
DOCDIR      ?= $(PREFIX)/share/doc/mindroom
UNITDIR     ?= $(PREFIX)/lib/systemd/system
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
NGINXDIR    ?= $(SYSCONFDIR)/nginx
DESTDIR     ?=
# Not FastCGI functions: their own units, outside the template's directory.
DAEMONS     := mindroom-lifecycle dokku-provisioner
SUBST = sed -e 's|/usr/lib/mindroom|$(LIBEXECDIR)|g' -e 's|/etc/mindroom|$(SYSCONFDIR)/mindroom|g' \
            -e 's|/usr/share/doc/mindroom|$(DOCDIR)|g' -e 's|/usr/share/mindroom|$(DATADIR)|g' \
            -e 's|/etc/nginx|$(NGINXDIR)|g'

install: build
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBEXECDIR)/functions $(DESTDIR)$(DATADIR)/migrations \
	    $(DESTDIR)$(DOCDIR) $(DESTDIR)$(UNITDIR)/mindroom-.service.d $(DESTDIR)$(TMPFILESDIR) \
	    $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(DATADIR)/nginx $(DESTDIR)$(NGINXDIR)/sites-available
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/mindroom
	install -m 0755 $(filter-out $(DAEMONS:%=$(BUILD)/bin/%),$(FUNC_BINS)) $(DESTDIR)$(LIBEXECDIR)/functions/
	install -m 0755 $(DAEMONS:%=$(BUILD)/bin/%) $(TOOL_BINS) $(DESTDIR)$(LIBEXECDIR)/
	sed -e 's|^INSTALLED_MIGRATIONS=$$|INSTALLED_MIGRATIONS=$(DATADIR)/migrations|' \
	    -e 's|^INSTALLED_LIBEXEC=$$|INSTALLED_LIBEXEC=$(LIBEXECDIR)|' scripts/migrate.sh \
	    > $(DESTDIR)$(LIBEXECDIR)/migrate.sh && chmod 0755 $(DESTDIR)$(LIBEXECDIR)/migrate.sh
	sed -e 's|^INSTALLED_LIBEXEC=$$|INSTALLED_LIBEXEC=$(LIBEXECDIR)|' \
	    -e 's|^INSTALLED_ENV=$$|INSTALLED_ENV=$(SYSCONFDIR)/mindroom/mindroom.env|' \
	    -e 's|^INSTALLED_VERSION=$$|INSTALLED_VERSION=$(VERSION)|' \
	    -e '/^\. "$$ROOT\/scripts\/load-env\.sh"$$/{r scripts/load-env.sh' -e 'd' -e '}' scripts/mindroomctl \
	    > $(DESTDIR)$(BINDIR)/mindroomctl && chmod 0755 $(DESTDIR)$(BINDIR)/mindroomctl
	install -m 0644 sql/migrations/*.sql $(DESTDIR)$(DATADIR)/migrations/
	install -m 0644 sql/seed.sql $(DESTDIR)$(DATADIR)/
	install -m 0644 .env.example $(DESTDIR)$(DATADIR)/mindroom.env.example
	install -m 0644 packaging/provisioner.env $(DESTDIR)$(DATADIR)/provisioner.env.example
	for f in packaging/systemd/*.service packaging/systemd/*.socket packaging/systemd/*.target \
	         packaging/systemd/mindroom-.service.d/*.conf; do \
	    $(SUBST) $$f > $(DESTDIR)$(UNITDIR)/$${f#packaging/systemd/} && \
	    chmod 0644 $(DESTDIR)$(UNITDIR)/$${f#packaging/systemd/} || exit 1; done
	install -m 0644 packaging/tmpfiles.d/mindroom.conf $(DESTDIR)$(TMPFILESDIR)/mindroom.conf
	install -m 0644 packaging/sysusers.d/mindroom.conf $(DESTDIR)$(SYSUSERSDIR)/mindroom.conf
	for f in $(filter-out nginx/dev.conf,$(wildcard nginx/*.conf)); do \
	    $(SUBST) $$f > $(DESTDIR)$(DATADIR)/$$f && chmod 0644 $(DESTDIR)$(DATADIR)/$$f || exit 1; done
	install -m 0644 README.md docs/*.md $(DESTDIR)$(DOCDIR)/
	[ -e $(DESTDIR)$(SYSCONFDIR)/mindroom/mindroom.env ] || \
	    install -m 0600 .env.example $(DESTDIR)$(SYSCONFDIR)/mindroom/mindroom.env
	[ -e $(DESTDIR)$(SYSCONFDIR)/mindroom/provisioner.env ] || \
	    install -m 0600 packaging/provisioner.env $(DESTDIR)$(SYSCONFDIR)/mindroom/provisioner.env
	[ -e $(DESTDIR)$(NGINXDIR)/sites-available/mindroom.conf ] || \
	    install -m 0644 $(DESTDIR)$(DATADIR)/nginx/site.conf $(DESTDIR)$(NGINXDIR)/sites-available/mindroom.conf

# A Debian package of the release build (build/mindroom_<version>_<arch>.deb),
# made with dpkg-deb: installable with `apt install ./build/mindroom_*.deb`.
deb: deps
	@$(MAKE) --no-print-directory build
	@packaging/deb/build.sh

# Builds the package and installs it into a fresh Debian 12 root (debootstrap,
# cached under build/package-test), with its dependencies and maintainer scripts,
# then checks files, users, permissions and every unit. Needs root and Debian's archive.
package-test: deb
	@packaging/package-test.sh

clean:
	rm -rf build
