-- 002_rls_policies.sql
-- Row Level Security on every table, and least-privilege grants.
--   anon           nothing
--   authenticated  SELECT of its own rows (accounts, subscriptions, instances without
--                  environment_vars, usage_metrics, audit_logs) and of plans;
--                  UPDATE of its own accounts.full_name / company_name only
--   service_role   bypasses RLS; the DML the functions need (audit_logs append-only,
--                  plans read-only, stripe_events never deleted)
-- Supabase grants ALL on new public tables to anon/authenticated/service_role by
-- default privileges, so everything is revoked first and granted back explicitly.

ALTER TABLE public.accounts      ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.plans         ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.subscriptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.instances     ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.usage_metrics ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.audit_logs    ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.stripe_events ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON public.accounts, public.plans, public.subscriptions, public.instances,
              public.usage_metrics, public.audit_logs, public.stripe_events
    FROM PUBLIC, anon, authenticated, service_role;

GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;

-- service_role: what the functions need.
GRANT SELECT, INSERT, UPDATE, DELETE ON public.accounts      TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.subscriptions TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.instances     TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.usage_metrics TO service_role;
GRANT SELECT, INSERT                 ON public.audit_logs    TO service_role;
GRANT SELECT, INSERT, UPDATE         ON public.stripe_events TO service_role;
GRANT SELECT                         ON public.plans         TO service_role;

-- authenticated: read own rows; update only harmless profile columns.
GRANT SELECT ON public.accounts, public.subscriptions, public.usage_metrics,
                public.audit_logs, public.plans TO authenticated;
GRANT UPDATE (full_name, company_name) ON public.accounts TO authenticated;
-- Every instances column except environment_vars (API keys of the instance).
-- Tenants must name their columns: `SELECT *` on instances is denied.
GRANT SELECT (id, subscription_id, dokku_app_name, subdomain, status, desired_status,
              backend_url, frontend_url, matrix_server_url, config,
              memory_limit_mb, cpu_limit, last_health_check, health_status, error_message,
              attempts, next_attempt_at, last_error, welcome_email_sent_at,
              provisioned_at, deprovisioned_at, created_at, updated_at)
    ON public.instances TO authenticated;

-- Policies. (select auth.uid()) is evaluated once per query, not per row.
CREATE POLICY "Users can view own account" ON public.accounts
    FOR SELECT TO authenticated
    USING (id = (SELECT auth.uid()));

CREATE POLICY "Users can update own account" ON public.accounts
    FOR UPDATE TO authenticated
    USING (id = (SELECT auth.uid()))
    WITH CHECK (id = (SELECT auth.uid()));

CREATE POLICY "Users can view plans" ON public.plans
    FOR SELECT TO authenticated
    USING (true);

CREATE POLICY "Users can view own subscriptions" ON public.subscriptions
    FOR SELECT TO authenticated
    USING (account_id = (SELECT auth.uid()));

CREATE POLICY "Users can view own instances" ON public.instances
    FOR SELECT TO authenticated
    USING (subscription_id IN (
        SELECT s.id FROM public.subscriptions s WHERE s.account_id = (SELECT auth.uid())));

CREATE POLICY "Users can view own usage" ON public.usage_metrics
    FOR SELECT TO authenticated
    USING (instance_id IN (
        SELECT i.id FROM public.instances i
        JOIN public.subscriptions s ON i.subscription_id = s.id
        WHERE s.account_id = (SELECT auth.uid())));

CREATE POLICY "Users can view own audit logs" ON public.audit_logs
    FOR SELECT TO authenticated
    USING (account_id = (SELECT auth.uid()));

-- stripe_events: no policy; only service_role (BYPASSRLS) touches it.
