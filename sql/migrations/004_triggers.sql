-- 004_triggers.sql
-- updated_at everywhere; auth.users -> accounts; tier -> limits; the instance status
-- state machine (SQLSTATE MR001 on an illegal change); audit rows for every
-- subscription and instance status change.

-- updated_at ------------------------------------------------------------------------
CREATE FUNCTION public.set_updated_at()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER accounts_updated_at      BEFORE UPDATE ON public.accounts
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER plans_updated_at         BEFORE UPDATE ON public.plans
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER subscriptions_updated_at BEFORE UPDATE ON public.subscriptions
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER instances_updated_at     BEFORE UPDATE ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER usage_metrics_updated_at BEFORE UPDATE ON public.usage_metrics
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER audit_logs_updated_at    BEFORE UPDATE ON public.audit_logs
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
CREATE TRIGGER stripe_events_updated_at BEFORE UPDATE ON public.stripe_events
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();

-- auth.users -> accounts ----------------------------------------------------------------
-- Runs as the role that writes auth.users (supabase_auth_admin on Supabase), hence
-- SECURITY DEFINER. A user without an email (phone sign-up) gets an account once an
-- email is set. full_name comes from the sign-up metadata when given.
CREATE FUNCTION public.handle_new_user()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF NEW.email IS NULL THEN
        RETURN NEW;
    END IF;
    INSERT INTO public.accounts (id, email, full_name)
    VALUES (NEW.id, NEW.email, NEW.raw_user_meta_data ->> 'full_name')
    ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email
        WHERE public.accounts.email IS DISTINCT FROM EXCLUDED.email;
    RETURN NEW;
END;
$$;

CREATE TRIGGER on_auth_user_created AFTER INSERT ON auth.users
    FOR EACH ROW EXECUTE FUNCTION public.handle_new_user();
CREATE TRIGGER on_auth_user_email_changed AFTER UPDATE OF email ON auth.users
    FOR EACH ROW WHEN (OLD.email IS DISTINCT FROM NEW.email)
    EXECUTE FUNCTION public.handle_new_user();

-- tier -> limits ------------------------------------------------------------------------
-- A subscription's limits follow its plan (public.plan_for) whenever it is created or
-- its tier or price changes; an operator may still override one subscription's limits
-- by updating them directly. A tier without any plan row is an error (23514).
CREATE FUNCTION public.apply_plan_limits()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    p public.plans;
BEGIN
    p := public.plan_for(NEW.tier, NEW.stripe_price_id);
    IF p.stripe_price_id IS NULL THEN
        RAISE EXCEPTION 'no plan for tier %', NEW.tier
            USING ERRCODE = '23514',
                  HINT = 'insert a row for this tier into public.plans';
    END IF;
    NEW.max_agents := p.max_agents;
    NEW.max_messages_per_day := p.max_messages_per_day;
    NEW.max_storage_gb := p.max_storage_gb;
    RETURN NEW;
END;
$$;

CREATE TRIGGER subscriptions_plan_limits_insert BEFORE INSERT ON public.subscriptions
    FOR EACH ROW EXECUTE FUNCTION public.apply_plan_limits();
CREATE TRIGGER subscriptions_plan_limits_update BEFORE UPDATE OF tier, stripe_price_id ON public.subscriptions
    FOR EACH ROW
    WHEN (OLD.tier IS DISTINCT FROM NEW.tier OR OLD.stripe_price_id IS DISTINCT FROM NEW.stripe_price_id)
    EXECUTE FUNCTION public.apply_plan_limits();

-- Instances take memory and CPU from their subscription's plan when created, and
-- follow a tier change while live (the lifecycle applies them in Dokku).
CREATE FUNCTION public.apply_instance_limits()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    p public.plans;
BEGIN
    SELECT (public.plan_for(s.tier, s.stripe_price_id)).* INTO p
      FROM public.subscriptions s WHERE s.id = NEW.subscription_id;
    IF p.stripe_price_id IS NOT NULL THEN
        NEW.memory_limit_mb := p.memory_limit_mb;
        NEW.cpu_limit := p.cpu_limit;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER instances_plan_limits BEFORE INSERT ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.apply_instance_limits();

CREATE FUNCTION public.sync_instance_limits()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    p public.plans;
BEGIN
    p := public.plan_for(NEW.tier, NEW.stripe_price_id);
    IF p.stripe_price_id IS NOT NULL THEN
        UPDATE public.instances
           SET memory_limit_mb = p.memory_limit_mb, cpu_limit = p.cpu_limit
         WHERE subscription_id = NEW.id AND status <> 'deprovisioned'
           AND (memory_limit_mb IS DISTINCT FROM p.memory_limit_mb
                OR cpu_limit IS DISTINCT FROM p.cpu_limit);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER subscriptions_sync_instance_limits AFTER UPDATE OF tier, stripe_price_id ON public.subscriptions
    FOR EACH ROW
    WHEN (OLD.tier IS DISTINCT FROM NEW.tier OR OLD.stripe_price_id IS DISTINCT FROM NEW.stripe_price_id)
    EXECUTE FUNCTION public.sync_instance_limits();

-- instance status state machine ---------------------------------------------------------
--   provisioning   -> running | failed | deprovisioning
--   running        -> stopped | failed | deprovisioning
--   stopped        -> provisioning | running | deprovisioning
--   failed         -> provisioning | deprovisioning
--   deprovisioning -> deprovisioned | failed
--   deprovisioned  (final)
-- Same status -> same status is allowed (a no-op for the machine).
CREATE FUNCTION public.instance_transition_allowed(p_from public.instance_status,
                                                   p_to public.instance_status)
RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT p_from = p_to OR (p_from, p_to) IN (
        ('provisioning'::public.instance_status,   'running'::public.instance_status),
        ('provisioning',   'failed'),
        ('provisioning',   'deprovisioning'),
        ('running',        'stopped'),
        ('running',        'failed'),
        ('running',        'deprovisioning'),
        ('stopped',        'provisioning'),
        ('stopped',        'running'),
        ('stopped',        'deprovisioning'),
        ('failed',         'provisioning'),
        ('failed',         'deprovisioning'),
        ('deprovisioning', 'deprovisioned'),
        ('deprovisioning', 'failed'))
$$;

-- Raises SQLSTATE MR001 on an illegal change. Entering running stamps provisioned_at,
-- entering deprovisioned stamps deprovisioned_at (unless the writer set them).
CREATE FUNCTION public.enforce_instance_status()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    IF NOT public.instance_transition_allowed(OLD.status, NEW.status) THEN
        RAISE EXCEPTION 'illegal instance status change from % to % (instance %)',
                        OLD.status, NEW.status, OLD.id
            USING ERRCODE = 'MR001';
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NEW.status = 'running' AND NEW.provisioned_at IS NOT DISTINCT FROM OLD.provisioned_at THEN
            NEW.provisioned_at := now();
        ELSIF NEW.status = 'deprovisioned' AND NEW.deprovisioned_at IS NOT DISTINCT FROM OLD.deprovisioned_at THEN
            NEW.deprovisioned_at := now();
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER instances_status_machine BEFORE UPDATE OF status ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.enforce_instance_status();

-- audit -------------------------------------------------------------------------------
-- One audit_logs row per created subscription/instance and per status change:
--   action subscription.created        details {subscription_id, status}
--          subscription.status_changed {subscription_id, from, to}
--          instance.created            {instance_id, subscription_id, status}
--          instance.status_changed     {instance_id, subscription_id, from, to}
-- account_id is the owning account. SECURITY DEFINER: audit_logs is append-only and
-- its writers need no privilege on it.
CREATE FUNCTION public.audit_status_change()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_account uuid;
    v_details jsonb;
BEGIN
    IF TG_TABLE_NAME = 'subscriptions' THEN
        v_account := NEW.account_id;
        v_details := jsonb_build_object('subscription_id', NEW.id);
    ELSE
        SELECT s.account_id INTO v_account FROM public.subscriptions s WHERE s.id = NEW.subscription_id;
        v_details := jsonb_build_object('instance_id', NEW.id, 'subscription_id', NEW.subscription_id);
    END IF;

    IF TG_OP = 'INSERT' THEN
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (v_account, left(TG_TABLE_NAME, -1) || '.created',
                v_details || jsonb_build_object('status', NEW.status));
    ELSIF OLD.status IS DISTINCT FROM NEW.status THEN
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (v_account, left(TG_TABLE_NAME, -1) || '.status_changed',
                v_details || jsonb_build_object('from', OLD.status, 'to', NEW.status));
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER subscriptions_audit_status AFTER INSERT OR UPDATE OF status ON public.subscriptions
    FOR EACH ROW EXECUTE FUNCTION public.audit_status_change();
CREATE TRIGGER instances_audit_status AFTER INSERT OR UPDATE OF status ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.audit_status_change();

-- privileges ------------------------------------------------------------------------------
REVOKE ALL ON FUNCTION public.set_updated_at() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.handle_new_user() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.apply_plan_limits() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.apply_instance_limits() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.sync_instance_limits() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.enforce_instance_status() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.audit_status_change() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.instance_transition_allowed(public.instance_status, public.instance_status)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_transition_allowed(public.instance_status, public.instance_status)
    TO service_role;
