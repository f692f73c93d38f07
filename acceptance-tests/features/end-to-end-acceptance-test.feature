# The user's guide, Figure A.1.  The values come from the deployment under test: bmi-uat.py exports the
# variables of config/tests-uat/<name>/config and the steps expand $VARIABLES in the tables.
Feature: Running an end-to-end acceptance test

  Scenario: Importing/Removing Image, DB/Ceph consistency
    Given RBD will create an image
      | image_name      |
      | $BMI_IMAGE_NAME |
    And BMI log line-count will be measured at the beginning
    When BMI will import an image
      | image_name      | project_name |
      | $BMI_IMAGE_NAME | $BMI_PROJECT |
    And BMI will provision a node
      | image_name      | project_name | network_name | node_name | NIC      |
      | $BMI_IMAGE_NAME | $BMI_PROJECT | $HIL_NETWORK | $HIL_NODE | $HIL_NIC |
    Then BMI will create a snapshot of a node
      | project_name | node_name | snapshot_name      |
      | $BMI_PROJECT | $HIL_NODE | $BMI_SNAPSHOT_NAME |
    Then RBD will confirm the snapshot exists
      | snapshot_name      |
      | $BMI_SNAPSHOT_NAME |
    And BMI will remove a snapshot
      | snapshot_name      | project_name |
      | $BMI_SNAPSHOT_NAME | $BMI_PROJECT |
    Then BMI will deprovision a node
      | project_name | network_name | node_name | NIC      |
      | $BMI_PROJECT | $HIL_NETWORK | $HIL_NODE | $HIL_NIC |
    And BMI will remove an image
      | image_name      | project_name |
      | $BMI_IMAGE_NAME | $BMI_PROJECT |
    Then RBD will confirm the removed image's clone
      | image_name      | project_name |
      | $BMI_IMAGE_NAME | $BMI_PROJECT |
    And RBD will remove the created image
      | image_name      |
      | $BMI_IMAGE_NAME |
    And BMI log line-count will be measured at the end
