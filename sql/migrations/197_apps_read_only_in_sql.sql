-- 197_apps_read_only_in_sql.sql: a third-party app's token may read, never act, in
-- the database too.
--
-- A token Supabase Auth's OAuth 2.1 server issued to a third-party app carries the
-- user's role (authenticated) and sub, plus client_id. The functions refuse its
-- writes before their handler runs (lib/mr_http.c), but on a Supabase project the
-- Data API (PostgREST) takes the same token straight to the database, where nothing
-- told the app from the user: with it an app could restart the user's instance
-- (POST /rest/v1/rpc/tenant_instance_restart) or rename the account (PATCH
-- /rest/v1/accounts). Those are the only writes a user's token reaches directly (the
-- rest of the schema is read-only to authenticated, or service_role's).
-- - public.is_users_own_session(): whether the request's claims are a session of the
--   user's own: no client_id member at all (Supabase Auth writes one only into the
--   tokens of sessions its OAuth server created; a present but empty or non-string
--   one is an app's all the same). The one place SQL asks.
-- - "Users can update own account" (002_rls_policies.sql) asks it beside the owner
--   (an app's UPDATE matches no row); ALTER POLICY keeps its name and roles.
-- - public.tenant_instance_restart (184_tenant_notice.sql, redefined whole, unchanged
--   but for the check) refuses an app with 42501 (PostgREST: 403), before anything
--   is read or locked.

CREATE FUNCTION public.is_users_own_session()
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT NOT coalesce((SELECT auth.jwt()) ? 'client_id', false);
$$;

REVOKE ALL ON FUNCTION public.is_users_own_session() FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.is_users_own_session() TO authenticated, service_role;

ALTER POLICY "Users can update own account" ON public.accounts
    USING (id = (SELECT auth.uid()) AND (SELECT public.is_users_own_session()))
    WITH CHECK (id = (SELECT auth.uid()) AND (SELECT public.is_users_own_session()));

CREATE OR REPLACE FUNCTION public.tenant_instance_restart(p_instance_id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    c_max constant integer := 3;
    c_window constant interval := '10 minutes';
    v_uid uuid := (SELECT auth.uid());
    v_id uuid;
    i public.instances;
    v_recent integer;
    v_oldest timestamptz;
BEGIN
    IF v_uid IS NULL THEN
        RAISE EXCEPTION 'a signed-in user''s call' USING ERRCODE = '42501';
    END IF;
    IF NOT public.is_users_own_session() THEN
        RAISE EXCEPTION 'a third-party app may read the instance, not restart it'
            USING ERRCODE = '42501';
    END IF;
    -- One request of an account at a time: the count below cannot race. NO KEY: rows
    -- that only reference the account (the worker's audit rows) are not in its way.
    PERFORM 1 FROM public.accounts a WHERE a.id = v_uid FOR NO KEY UPDATE;
    SELECT x.id INTO v_id
      FROM public.instances x JOIN public.subscriptions s ON s.id = x.subscription_id
     WHERE s.account_id = v_uid AND (p_instance_id IS NULL OR x.id = p_instance_id)
     ORDER BY (x.status = 'deprovisioned'), public.is_entitled(s.status) DESC, x.created_at DESC, x.id
     LIMIT 1;
    IF v_id IS NULL THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    SELECT * INTO i FROM public.instances x WHERE x.id = v_id FOR UPDATE;
    IF i.status <> 'running' OR i.desired_status <> 'running' THEN
        RETURN jsonb_build_object('outcome', 'not_running', 'status', i.status,
                                  'desired_status', i.desired_status,
                                  'notice', public.tenant_instance(v_id) #>> '{instance,notice,message}');
    END IF;
    IF i.restart_version > i.applied_restart_version THEN
        RETURN jsonb_build_object('outcome', 'pending', 'my_instance', public.tenant_instance(v_id));
    END IF;
    SELECT count(*)::integer, min(a.created_at) INTO v_recent, v_oldest
      FROM public.audit_logs a
     WHERE a.account_id = v_uid AND a.action = 'instance.restart_requested'
       AND a.created_at > now() - c_window;
    IF v_recent >= c_max THEN
        RETURN jsonb_build_object('outcome', 'rate_limited', 'limit', c_max,
                                  'window_s', extract(epoch FROM c_window)::integer,
                                  'retry_after_s',
                                  greatest(1, ceil(extract(epoch FROM v_oldest + c_window - now())))::integer);
    END IF;
    UPDATE public.instances SET restart_version = restart_version + 1, restart_requested_at = now()
     WHERE id = v_id RETURNING * INTO i;
    INSERT INTO public.audit_logs (account_id, action, details)
    VALUES (v_uid, 'instance.restart_requested',
            jsonb_build_object('instance_id', i.id, 'restart_version', i.restart_version));
    RETURN jsonb_build_object('outcome', 'ok', 'my_instance', public.tenant_instance(v_id));
END;
$$;
