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

.PHONY: all build tests test run stop bench valgrind fuzz drills clean deps FORCE
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

clean:
	rm -rf build
