-- 185_no_instance_notice.sql: my-instance's 404 says why a customer has no instance
-- when its first payment explains it.
--
-- A customer who paid through Checkout by bank debit has an `incomplete`
-- subscription and no instance until the debit clears, days later (183); my-instance
-- answered 404 "you have no instance" with nothing saying the payment is under way
-- and the instance will come. One whose first payment was given up
-- (`incomplete_expired`) got the same words.
--
-- - public.tenant_no_instance_notice(): tenant_instance_notice's words for a
--   subscription without an instance (184: `payment_processing` while it is
--   `incomplete`, `payment_not_completed` once `incomplete_expired`) for the caller, from its
--   subscriptions without an instance (one still processing first, else the newest),
--   or NULL. Runs as the caller (RLS: its own rows). my-instance asks it only for its
--   404 without instance_id and adds it to the answer.

CREATE FUNCTION public.tenant_no_instance_notice()
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_uid uuid := (SELECT auth.uid());
    v_status public.subscription_status;
BEGIN
    IF v_uid IS NULL THEN
        RAISE EXCEPTION 'a signed-in user''s call' USING ERRCODE = '42501';
    END IF;
    -- The account test keeps RLS's answer for a caller that bypasses RLS.
    SELECT s.status INTO v_status
      FROM public.subscriptions s
     WHERE s.account_id = v_uid
       AND NOT EXISTS (SELECT 1 FROM public.instances i WHERE i.subscription_id = s.id)
     ORDER BY (s.status = 'incomplete') DESC, s.created_at DESC, s.id
     LIMIT 1;
    RETURN public.tenant_instance_notice(NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                                         v_status, NULL, NULL, NULL);
END;
$$;

REVOKE ALL ON FUNCTION public.tenant_no_instance_notice() FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.tenant_no_instance_notice() TO authenticated, service_role;
