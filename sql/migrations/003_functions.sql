-- 003_functions.sql
-- SQL functions. Every function pins search_path (SECURITY DEFINER ones to '' with
-- fully qualified names); EXECUTE is revoked from PUBLIC and anon and granted only to
-- the roles that call it.

-- Deterministic Dokku app name and subdomain of a subscription's instance:
-- 'mindroom-' / 'm' followed by the first 12 hex digits of the subscription id.
CREATE FUNCTION public.instance_names(p_subscription_id uuid)
RETURNS TABLE (dokku_app_name text, subdomain text)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT 'mindroom-' || h, 'm' || h
    FROM (SELECT left(replace(p_subscription_id::text, '-', ''), 12) AS h) AS x
$$;

-- The plan row that sets the limits of a subscription: the row of its price id when
-- that price belongs to its tier, else the tier's first plan (created_at, price id).
CREATE FUNCTION public.plan_for(p_tier public.subscription_tier, p_price_id text)
RETURNS public.plans
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT p.* FROM public.plans p
    WHERE p.tier = p_tier
    ORDER BY (p.stripe_price_id = p_price_id) IS TRUE DESC, p.created_at, p.stripe_price_id
    LIMIT 1
$$;

-- Entitled to an instance: trialing, active, past_due (the one place this is decided).
CREATE FUNCTION public.is_entitled(p_status public.subscription_status)
RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = ''
AS $$
    SELECT p_status IN ('trialing', 'active', 'past_due')
$$;

-- True when the caller acts as service_role (SET ROLE service_role, or a superuser).
-- authenticator is NOINHERIT, so it does not count until it switches role.
CREATE FUNCTION public.is_service_role()
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT pg_catalog.pg_has_role(current_user, 'service_role', 'USAGE')
$$;

-- The user's current instance: the newest running instance of an entitled
-- (trialing, active, past_due) subscription. Result columns as in the original plan.
-- Returns nothing for another user's id unless called by service_role.
CREATE FUNCTION public.get_user_instance(user_id uuid)
RETURNS TABLE (
    instance_id  uuid,
    subdomain    text,
    frontend_url text,
    backend_url  text,
    status       public.instance_status,
    tier         public.subscription_tier
)
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
    IF user_id IS NULL
       OR NOT (public.is_service_role() OR user_id = (SELECT auth.uid())) THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT i.id, i.subdomain, i.frontend_url, i.backend_url, i.status, s.tier
    FROM public.instances i
    JOIN public.subscriptions s ON i.subscription_id = s.id
    WHERE s.account_id = get_user_instance.user_id
      AND public.is_entitled(s.status)
      AND i.status = 'running'
    ORDER BY i.created_at DESC, i.id
    LIMIT 1;
END;
$$;

-- Counts one message of an instance (per agent and tool) and reports whether it is
-- within the subscription's daily limit.
--   allowed   true: counted (today's count was below max_messages_per_day, or the
--             limit is NULL = unlimited); false: the limit is reached, nothing counted
--   remaining messages left today after this one (NULL when unlimited)
-- The daily counter resets lazily: the first call on a day after last_reset_at starts
-- from zero. The subscription row is locked for the call, so concurrent calls from
-- many connections lose no counts. Raises P0002 for an unknown instance.
CREATE FUNCTION public.track_usage(
    p_instance_id uuid,
    p_agent_name  text DEFAULT NULL,
    p_tool_name   text DEFAULT NULL
) RETURNS TABLE (allowed boolean, remaining integer)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_sub   uuid;
    v_count integer;
    v_max   integer;
    v_reset date;
BEGIN
    SELECT i.subscription_id INTO v_sub FROM public.instances i WHERE i.id = p_instance_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown instance %', p_instance_id USING ERRCODE = 'P0002';
    END IF;

    SELECT s.current_messages_today, s.max_messages_per_day, s.last_reset_at
      INTO v_count, v_max, v_reset
      FROM public.subscriptions s WHERE s.id = v_sub
      FOR UPDATE;
    IF v_reset IS NULL OR v_reset < CURRENT_DATE THEN
        v_count := 0;
    END IF;
    v_count := coalesce(v_count, 0);

    IF v_max IS NOT NULL AND v_count >= v_max THEN
        UPDATE public.subscriptions
           SET current_messages_today = v_count, last_reset_at = CURRENT_DATE
         WHERE id = v_sub AND (current_messages_today IS DISTINCT FROM v_count
                               OR last_reset_at IS DISTINCT FROM CURRENT_DATE);
        allowed := false; remaining := 0;
        RETURN NEXT;
        RETURN;
    END IF;

    v_count := v_count + 1;
    UPDATE public.subscriptions
       SET current_messages_today = v_count, last_reset_at = CURRENT_DATE
     WHERE id = v_sub;

    INSERT INTO public.usage_metrics AS u (instance_id, date, messages_sent, agents_used, tools_used)
    VALUES (p_instance_id, CURRENT_DATE, 1,
            CASE WHEN p_agent_name IS NOT NULL
                 THEN jsonb_build_object(p_agent_name, 1) ELSE '{}'::jsonb END,
            CASE WHEN p_tool_name IS NOT NULL
                 THEN jsonb_build_object(p_tool_name, 1) ELSE '{}'::jsonb END)
    ON CONFLICT (instance_id, date) DO UPDATE
    SET messages_sent = coalesce(u.messages_sent, 0) + 1,
        agents_used = CASE WHEN p_agent_name IS NOT NULL
                           THEN coalesce(u.agents_used, '{}'::jsonb) || jsonb_build_object(p_agent_name,
                                coalesce((u.agents_used ->> p_agent_name)::int, 0) + 1)
                           ELSE u.agents_used END,
        tools_used = CASE WHEN p_tool_name IS NOT NULL
                          THEN coalesce(u.tools_used, '{}'::jsonb) || jsonb_build_object(p_tool_name,
                               coalesce((u.tools_used ->> p_tool_name)::int, 0) + 1)
                          ELSE u.tools_used END;

    allowed := true;
    remaining := CASE WHEN v_max IS NULL THEN NULL ELSE v_max - v_count END;
    RETURN NEXT;
END;
$$;

REVOKE ALL ON FUNCTION public.instance_names(uuid) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.plan_for(public.subscription_tier, text) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.is_service_role() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.is_entitled(public.subscription_status) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.get_user_instance(uuid) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.track_usage(uuid, text, text) FROM PUBLIC, anon, authenticated;

GRANT EXECUTE ON FUNCTION public.instance_names(uuid) TO service_role;
GRANT EXECUTE ON FUNCTION public.plan_for(public.subscription_tier, text) TO service_role;
GRANT EXECUTE ON FUNCTION public.is_service_role() TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.is_entitled(public.subscription_status) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.get_user_instance(uuid) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.track_usage(uuid, text, text) TO service_role;
