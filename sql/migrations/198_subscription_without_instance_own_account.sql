-- 198_subscription_without_instance_own_account.sql: the account's subscription
-- without an instance is answered only to that account (or the service role),
-- whatever rights the caller's role has.
--
-- public.tenant_subscription_without_instance_id(p_account) (195) ran as the caller
-- and took the account from its argument: Row Level Security hid other accounts'
-- subscriptions from `authenticated` itself, but a role exempt from it (BYPASSRLS)
-- and a member of `authenticated` without being `service_role` got any account's
-- subscription id, and through public.tenant_subscription_without_instance its
-- status. The rule of get_user_instance (178): only a caller known to be the service
-- role or the account asked about (IS NOT TRUE: a NULL user refuses). Its callers
-- (public.tenant_instance and public.tenant_no_instance_notice) pass auth.uid().
--
-- Redefines public.tenant_subscription_without_instance_id (195) whole, unchanged but
-- for the guard. CREATE OR REPLACE keeps its grants (authenticated, service_role).

CREATE OR REPLACE FUNCTION public.tenant_subscription_without_instance_id(p_account uuid)
RETURNS uuid
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT s.id
      FROM public.subscriptions s
     WHERE s.account_id = p_account
       AND (public.is_service_role() OR p_account = (SELECT auth.uid())) IS TRUE
       AND NOT EXISTS (SELECT 1 FROM public.instances i WHERE i.subscription_id = s.id)
     ORDER BY (s.status = 'incomplete') DESC, s.created_at DESC, s.id
     LIMIT 1
$$;
