# Requests BMI must refuse, each with exit status 1, a message on stderr and no change of state.
Feature: BMI refuses bad requests

  Scenario: A wrong password is refused
    When BMI runs "db ls" with a wrong password
    Then the command fails with a message matching "authentication"

  Scenario: A tenant cannot use another tenant's project
    When BMI runs "ls $BMI_PROJECT" as "$UAT_OTHER_USERNAME" with the password "$UAT_OTHER_PASSWORD"
    Then the command fails with a message matching "access|forbidden|not allowed|permission"
    When BMI runs "pro $BMI_PROJECT $HIL_NODE $BMI_IMAGE_NAME $HIL_NETWORK $HIL_NIC" as "$UAT_OTHER_USERNAME" with the password "$UAT_OTHER_PASSWORD"
    Then the command fails with a message matching "access|forbidden|not allowed|permission"
    And node "$HIL_NODE" of "$BMI_PROJECT" is not provisioned

  Scenario: Provisioning with an unknown image is refused
    When BMI runs "pro $BMI_PROJECT $HIL_NODE $BMI_IMAGE_NAME-missing $HIL_NETWORK $HIL_NIC"
    Then the command fails with a message matching "not found"
    And node "$HIL_NODE" of "$BMI_PROJECT" is not provisioned

  Scenario: An invalid image name is refused
    When BMI runs "import $BMI_PROJECT ../etc"
    Then the command fails with a message matching "invalid.*name"
    And BMI has no image named "../etc" in "$BMI_PROJECT"

  Scenario: Provisioning a node twice is refused and changes nothing
    Given RBD will create an image
      | image_name          |
      | $BMI_IMAGE_NAME-neg |
    And BMI will import an image
      | image_name          | project_name |
      | $BMI_IMAGE_NAME-neg | $BMI_PROJECT |
    And BMI will provision a node
      | image_name          | project_name | network_name | node_name | NIC      |
      | $BMI_IMAGE_NAME-neg | $BMI_PROJECT | $HIL_NETWORK | $HIL_NODE | $HIL_NIC |
    And the BMI, Ceph and iSCSI state is recorded
    When BMI runs "pro $BMI_PROJECT $HIL_NODE $BMI_IMAGE_NAME-neg $HIL_NETWORK $HIL_NIC"
    Then the command fails with a message matching "already provisioned|conflict|busy"
    And the BMI, Ceph and iSCSI state is unchanged
    Then BMI will deprovision a node
      | project_name | network_name | node_name | NIC      |
      | $BMI_PROJECT | $HIL_NETWORK | $HIL_NODE | $HIL_NIC |
    And BMI will remove an image
      | image_name          | project_name |
      | $BMI_IMAGE_NAME-neg | $BMI_PROJECT |
    And RBD will remove the created image
      | image_name          |
      | $BMI_IMAGE_NAME-neg |
