-- 001_initial_schema.sql
-- Tables and enums of the original plan (names, enum values and defaults kept),
-- plus what the design adds: every Stripe subscription status, a terminal
-- `deprovisioned` instance status, `plans`, `stripe_events`, event ordering on
-- subscriptions, and retry/lifecycle state on instances.

CREATE TYPE public.subscription_tier AS ENUM ('free', 'starter', 'professional', 'enterprise');

-- Stripe's `canceled` is stored as `cancelled` (the plan's spelling).
-- Entitled to an instance: trialing, active, past_due.
CREATE TYPE public.subscription_status AS ENUM (
    'trialing', 'active', 'cancelled', 'past_due', 'incomplete',
    'unpaid', 'paused', 'incomplete_expired');

CREATE TYPE public.instance_status AS ENUM (
    'provisioning', 'running', 'stopped', 'failed', 'deprovisioning', 'deprovisioned');

-- One row per Supabase Auth user; created by the trigger on auth.users (004).
CREATE TABLE public.accounts (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid()
                       REFERENCES auth.users (id) ON DELETE CASCADE,
    email              text UNIQUE NOT NULL,
    full_name          text,
    company_name       text,
    stripe_customer_id text UNIQUE,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Stripe price id -> tier and the limits that go with it. Local/test rows come from
-- seed.sql; production price ids are inserted by the operator. A tier's default plan
-- (used when a subscription's price id has no row) is its first row by
-- (created_at, stripe_price_id).
CREATE TABLE public.plans (
    stripe_price_id      text PRIMARY KEY,
    tier                 public.subscription_tier NOT NULL,
    name                 text,                                           -- display name
    max_agents           integer NOT NULL CHECK (max_agents >= 0),
    max_messages_per_day integer CHECK (max_messages_per_day >= 0),   -- NULL = unlimited
    max_storage_gb       integer NOT NULL CHECK (max_storage_gb >= 0),
    memory_limit_mb      integer NOT NULL CHECK (memory_limit_mb > 0),
    cpu_limit            numeric(3,2) NOT NULL CHECK (cpu_limit > 0),    -- as instances.cpu_limit
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX plans_tier_idx ON public.plans (tier, created_at, stripe_price_id);

CREATE TABLE public.subscriptions (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id             uuid NOT NULL REFERENCES public.accounts (id) ON DELETE CASCADE,
    stripe_subscription_id text UNIQUE,
    stripe_price_id        text,
    tier                   public.subscription_tier NOT NULL DEFAULT 'free',
    status                 public.subscription_status NOT NULL DEFAULT 'trialing',

    -- Limits: copied from the tier's plan by a trigger (004); never hard-coded in C.
    max_agents             integer DEFAULT 1,
    max_messages_per_day   integer DEFAULT 100,       -- NULL = unlimited
    max_storage_gb         integer DEFAULT 1,

    -- Daily usage, reset lazily by track_usage() on the first call of a new day.
    current_messages_today integer DEFAULT 0,
    last_reset_at          date DEFAULT CURRENT_DATE,

    trial_ends_at          timestamptz,
    current_period_end     timestamptz,
    cancelled_at           timestamptz,
    cancel_at_period_end   boolean NOT NULL DEFAULT false,

    -- Ordering of Stripe events: `created` of the last event applied to this row
    -- (to_timestamp(event.created)) and its id. An event older than
    -- last_event_created must not overwrite the row.
    last_event_created     timestamptz,
    last_event_id          text,

    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_account_id_idx ON public.subscriptions (account_id);

CREATE TABLE public.instances (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    subscription_id       uuid NOT NULL REFERENCES public.subscriptions (id) ON DELETE CASCADE,

    -- Dokku configuration; see public.instance_names() for the deterministic values.
    dokku_app_name        text NOT NULL,
    subdomain             text NOT NULL,

    status                public.instance_status NOT NULL DEFAULT 'provisioning',
    -- What the control plane owes: the webhook sets it, lifecycle and the sweep
    -- move `status` toward it.
    desired_status        public.instance_status NOT NULL DEFAULT 'running'
                          CHECK (desired_status IN ('running', 'stopped', 'deprovisioned')),
    backend_url           text,
    frontend_url          text,
    matrix_server_url     text,

    config                jsonb DEFAULT '{}'::jsonb,
    environment_vars      jsonb DEFAULT '{}'::jsonb,   -- never readable by tenants (002)

    -- Resource limits (enforced by Dokku); copied from the plan (004).
    memory_limit_mb       integer DEFAULT 512,
    cpu_limit             decimal(3,2) DEFAULT 0.5,

    last_health_check     timestamptz,
    health_status         text,
    error_message         text,

    -- Retry state for provisioning/deprovisioning work.
    attempts              integer NOT NULL DEFAULT 0,
    next_attempt_at       timestamptz,
    last_error            text,
    welcome_email_sent_at timestamptz,

    provisioned_at        timestamptz,
    deprovisioned_at      timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
-- At most one live (not deprovisioned) instance per subscription; this index also
-- serves the foreign key. Upsert with:
--   ON CONFLICT (subscription_id) WHERE status <> 'deprovisioned' DO NOTHING
CREATE UNIQUE INDEX instances_one_live_per_subscription
    ON public.instances (subscription_id) WHERE status <> 'deprovisioned';
CREATE INDEX instances_subscription_id_idx ON public.instances (subscription_id);
-- App names and subdomains are unique among live instances (a deprovisioned app no
-- longer exists in Dokku, so its subscription may be provisioned again).
CREATE UNIQUE INDEX instances_dokku_app_name_live
    ON public.instances (dokku_app_name) WHERE status <> 'deprovisioned';
CREATE UNIQUE INDEX instances_subdomain_live
    ON public.instances (subdomain) WHERE status <> 'deprovisioned';
-- The sweep: work owed, due for a retry.
CREATE INDEX instances_status_next_attempt_idx ON public.instances (status, next_attempt_at);

CREATE TABLE public.usage_metrics (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    instance_id   uuid NOT NULL REFERENCES public.instances (id) ON DELETE CASCADE,
    date          date NOT NULL,

    messages_sent integer DEFAULT 0,
    agents_used   jsonb DEFAULT '{}'::jsonb,   -- {"agent_name": count}
    tools_used    jsonb DEFAULT '{}'::jsonb,   -- {"tool_name": count}

    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (instance_id, date)                 -- also indexes the foreign key
);

-- Append-only log of important events. account_id is the account concerned (the
-- owner of the subscription/instance), so users can read their own history.
CREATE TABLE public.audit_logs (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id uuid REFERENCES public.accounts (id) ON DELETE SET NULL,
    action     text NOT NULL,
    details    jsonb DEFAULT '{}'::jsonb,
    ip_address inet,
    user_agent text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_logs_account_id_idx ON public.audit_logs (account_id, created_at);

-- Every Stripe event received (deduplicated on its id).
--   status: received  recorded, processing not finished (a crash mid-way leaves this)
--           processed applied to the database
--           ignored   an event type the webhook does not handle
--           stale     older than the state already applied (event ordering), skipped
--           deferred  cannot be applied yet (e.g. the account is not linked yet);
--                     answered 5xx so Stripe retries; `error` says why
--           failed    permanent error (e.g. unknown price id); `error` says why
CREATE TABLE public.stripe_events (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    created      timestamptz NOT NULL,
    api_version  text,
    livemode     boolean NOT NULL DEFAULT false,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    status       text NOT NULL DEFAULT 'received'
                 CHECK (status IN ('received', 'processed', 'ignored', 'stale', 'deferred', 'failed')),
    error        text,
    attempts     integer NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_events_status_idx ON public.stripe_events (status, received_at);
