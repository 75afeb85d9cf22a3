-- 178_user_instance_fails_closed.sql: get_user_instance answers nothing to a caller
-- with no user id, whatever rights the caller's role has.
--
-- Its guard was `IF user_id IS NULL OR NOT (is_service_role() OR user_id =
-- auth.uid()) THEN RETURN`. With no `sub` in the claims auth.uid() is NULL, the
-- comparison is NULL, NOT (false OR NULL) is NULL, and an IF on NULL does not
-- return: the query ran for whatever user_id was given. Row Level Security still hid
-- other accounts' rows from `authenticated` itself, but a role that is exempt from
-- it (BYPASSRLS) and a member of `authenticated` without being `service_role` got
-- any account's instance. The guard now lets through only a caller it knows to be
-- the service role or the user asked about (IS NOT TRUE: NULL refuses).
--
-- Redefines public.get_user_instance (003_functions.sql) whole, unchanged but for
-- the guard. CREATE OR REPLACE keeps its grants (authenticated, service_role).

CREATE OR REPLACE FUNCTION public.get_user_instance(user_id uuid)
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
    IF (public.is_service_role() OR user_id = (SELECT auth.uid())) IS NOT TRUE THEN
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
