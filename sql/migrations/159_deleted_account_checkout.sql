-- 159_deleted_account_checkout.sql: the paid checkout of a deleted account is
-- recorded ignored, not as a refused account link.
--
-- A checkout.session.completed whose session was paid after its account was deleted
-- names an account that no longer exists: stripe_account_for refused it (a security
-- event: audited stripe.account_link_refused, logged at error, counted by mindroomctl
-- refused-links), while the subscription that checkout made is cancelled at Stripe
-- as a deleted account's (142_deleted_account_late_subscription.sql). Now the rule
-- of 142 (the customer is no live account's, and it is a deleted account's customer
-- or the claim names a deleted account) is one function,
-- public.stripe_deleted_account, used by stripe_deleted_account_subscription and by
-- stripe_account_for where it would refuse a claim of an account that does not
-- exist: such an event is recorded ignored (SQLSTATE MRW05), with why. A claim of a
-- live account other than the customer's, or of an account that never existed, is
-- refused as before.
--
-- Redefines, each whole and unchanged but for the lines named (CREATE OR REPLACE, so
-- their grants stay):
-- - public.stripe_deleted_account_subscription (142): its lookup is the new function;
-- - public.stripe_account_for (129_customer_deleted.sql): the MRW05 for a claim of a
--   deleted account.

-- The deleted account that p_customer (no live account's) or p_claim names, if any.
-- SECURITY DEFINER: the webhook's role may not read deleted_account_customers.
CREATE FUNCTION public.stripe_deleted_account(p_customer text, p_claim text)
RETURNS uuid
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_claim uuid;
    v_account uuid;
BEGIN
    IF p_claim ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        v_claim := p_claim::uuid;
    END IF;
    SELECT d.account_id INTO v_account FROM public.deleted_account_customers d
     WHERE d.stripe_customer_id = p_customer OR d.account_id = v_claim
     ORDER BY d.stripe_customer_id = p_customer DESC NULLS LAST, d.deleted_at DESC
     LIMIT 1;
    IF NOT FOUND OR EXISTS (SELECT 1 FROM public.accounts a WHERE a.stripe_customer_id = p_customer) THEN
        RETURN NULL;
    END IF;
    RETURN v_account;
END;
$$;
REVOKE ALL ON FUNCTION public.stripe_deleted_account(text, text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.stripe_deleted_account(text, text) TO service_role;

CREATE OR REPLACE FUNCTION public.stripe_deleted_account_subscription(
    p_stripe_subscription_id text, p_customer text, p_claim text,
    p_status public.subscription_status)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_sub public.subscriptions;
BEGIN
    v_sub.account_id := public.stripe_deleted_account(p_customer, p_claim);
    IF v_sub.account_id IS NULL THEN
        RETURN false;
    END IF;
    v_sub.stripe_subscription_id := p_stripe_subscription_id;
    v_sub.status := p_status;
    PERFORM public.stripe_cancellation_record(v_sub, p_customer);
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION public.stripe_account_for(p_customer text, p_account_id text)
RETURNS uuid
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_id     uuid;
    v_claim  uuid;
    v_cust   text;
    v_reason text;
    v_gone   boolean;
BEGIN
    IF p_customer IS NULL OR p_customer = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW03', MESSAGE = 'the event names no Stripe customer';
    END IF;
    IF p_account_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        v_claim := p_account_id::uuid;
    END IF;

    SELECT a.id INTO v_id FROM public.accounts a WHERE a.stripe_customer_id = p_customer;
    IF NOT FOUND THEN
        SELECT b.account_id, b.customer_deleted_at IS NOT NULL INTO v_id, v_gone
          FROM public.billing_attempts b
         WHERE b.kind = 'customer' AND b.status = 'succeeded' AND b.object_id = p_customer
         ORDER BY b.created_at, b.id LIMIT 1;
        -- A customer Stripe deleted still names its account (its late events are that
        -- account's) but is never its customer again (129).
        IF FOUND AND NOT v_gone THEN
            UPDATE public.accounts SET stripe_customer_id = p_customer
             WHERE id = v_id AND stripe_customer_id IS NULL;
        END IF;
    END IF;

    IF v_id IS NOT NULL THEN
        IF p_account_id IS NULL OR v_claim = v_id THEN
            RETURN v_id;
        END IF;
        v_reason := 'it names an account other than its customer''s';
    ELSIF p_account_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW01',
            MESSAGE = 'unknown account: no account has this customer and no account id was given';
    ELSIF v_claim IS NULL THEN
        v_reason := 'the account id it names is not an account id';
    ELSE
        SELECT a.stripe_customer_id INTO v_cust FROM public.accounts a WHERE a.id = v_claim;
        IF NOT FOUND AND public.stripe_deleted_account(p_customer, p_account_id) IS NOT NULL THEN
            -- Paid after its account was deleted: not a link anyone can abuse, and its
            -- subscription is cancelled at Stripe as a deleted account's (142).
            RAISE EXCEPTION USING ERRCODE = 'MRW05',
                MESSAGE = 'ignored: the account it names was deleted; its subscription is cancelled at Stripe by us';
        ELSIF NOT FOUND THEN
            v_reason := 'the account it names does not exist';
        ELSIF v_cust IS NOT NULL THEN
            v_reason := 'the account it names is linked to another Stripe customer';
        ELSIF EXISTS (SELECT 1 FROM public.billing_attempts b
                       WHERE b.account_id = v_claim AND b.kind = 'customer'
                         AND b.status = 'pending' AND b.created_at > now() - interval '24 hours') THEN
            RAISE EXCEPTION USING ERRCODE = 'MRW01',
                MESSAGE = 'unknown account: the named account''s Stripe customer is still being created';
        ELSE
            v_reason := 'the account it names has no Stripe customer of ours';
        END IF;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'MRW04', MESSAGE = 'account link refused: ' || v_reason,
        DETAIL = jsonb_build_object('customer', p_customer, 'claimed_account', p_account_id)::text;
END;
$$;
